//! A channel published as an SSM parameter: `/images/<image>/<channel>` →
//! the AMI id, in every region the AMI was made or copied in, with the
//! `aws:ec2:image` data type that launch templates (`resolve:ssm:`) and
//! Terraform's `aws_ssm_parameter` read.

use super::client::load_sdk_config;
use aws_sdk_ssm::types::ParameterType;
use std::collections::BTreeMap;

/// Sets `parameter` to the AMI of each region in `amis` (region → AMI id),
/// and returns `region:parameter=ami` for each.
pub async fn publish(
    amis: &BTreeMap<String, String>,
    parameter: &str,
) -> Result<Vec<String>, String> {
    let mut published = Vec::new();
    for (region, ami) in amis {
        let config = load_sdk_config(Some(region), None).await;
        let ssm = aws_sdk_ssm::Client::new(&config);
        ssm.put_parameter()
            .name(parameter)
            .value(ami)
            .r#type(ParameterType::String)
            .data_type("aws:ec2:image")
            .overwrite(true)
            .send()
            .await
            .map_err(|err| {
                format!(
                    "cannot set the SSM parameter {parameter} in {region} to {ami}: {}; check the credentials allow ssm:PutParameter there",
                    aws_sdk_ssm::error::DisplayErrorContext(&err)
                )
            })?;
        published.push(format!("{region}:{parameter}={ami}"));
    }
    Ok(published)
}
