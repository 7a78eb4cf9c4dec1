//! Resolves the AMI the build starts from: `source_ami` as given (checked
//! to exist and be usable), or the match of `source_ami_filter`, newest
//! first when `most_recent` is set. The choice is logged and recorded in
//! the artifact, so the manifest says exactly what an image was built on.

use super::client::{AwsResultExt, filter};
use super::config::SourceAmiFilter;
use super::{Ec2State, Plan, SourceAmi};
use async_trait::async_trait;
use aws_sdk_ec2::types::{DeviceType, Image};
use imgbuild_core::{Step, StepContext, StepError};
use std::sync::Arc;

pub struct StepSourceAmi {
    plan: Arc<Plan>,
}

impl StepSourceAmi {
    pub fn new(plan: Arc<Plan>) -> Self {
        StepSourceAmi { plan }
    }

    async fn by_id(&self, id: &str) -> Result<Image, StepError> {
        let region = &self.plan.region;
        let result = self
            .plan
            .client()
            .describe_images()
            .image_ids(id)
            .send()
            .await
            .aws("DescribeImages", region);
        let images = match result {
            Ok(output) => output.images().to_vec(),
            Err(err) if err.is("InvalidAMIID.NotFound") => Vec::new(),
            Err(err) => return Err(err.into()),
        };
        images.into_iter().next().ok_or_else(|| {
            StepError::failed(format!(
                "source AMI {id} does not exist in {region}, or is not shared with this account; AMI ids differ between regions"
            ))
        })
    }

    async fn by_filter(&self, wanted: &SourceAmiFilter) -> Result<Image, StepError> {
        let region = &self.plan.region;
        let client = self.plan.client();
        let mut images: Vec<Image> = Vec::new();
        let mut next_token: Option<String> = None;
        loop {
            let mut request = client
                .describe_images()
                .set_owners(Some(wanted.owners.clone()))
                .filters(filter("state", "available"))
                .set_next_token(next_token.take());
            for (name, value) in &wanted.filters {
                request = request.filters(filter(name, value));
            }
            let output = request.send().await.aws("DescribeImages", region)?;
            images.extend(output.images().iter().cloned());
            match output.next_token() {
                Some(token) if !token.is_empty() => next_token = Some(token.to_owned()),
                _ => break,
            }
        }
        let described = describe_filter(wanted);
        // ISO 8601 timestamps in one format sort as strings.
        images.sort_by(|a, b| {
            a.creation_date()
                .cmp(&b.creation_date())
                .then(a.image_id().cmp(&b.image_id()))
        });
        match images.len() {
            0 => Err(StepError::failed(format!(
                "no available AMI in {region} matches {described}; check the filters and owners, e.g. with `aws ec2 describe-images --region {region}`"
            ))),
            1 => Ok(images.remove(0)),
            _ if wanted.most_recent => Ok(images.pop().expect("several images")),
            count => {
                let listed: Vec<String> = images
                    .iter()
                    .rev()
                    .take(5)
                    .map(|image| {
                        format!(
                            "{} ({}, {})",
                            image.image_id().unwrap_or("?"),
                            image.name().unwrap_or("unnamed"),
                            image.creation_date().unwrap_or("no date")
                        )
                    })
                    .collect();
                Err(StepError::failed(format!(
                    "{count} AMIs in {region} match {described}, newest first: {}{}; set `most_recent = true` to take the newest, or narrow the filters",
                    listed.join(", "),
                    if count > 5 { ", ..." } else { "" }
                )))
            }
        }
    }
}

fn describe_filter(wanted: &SourceAmiFilter) -> String {
    let filters: Vec<String> = wanted
        .filters
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    format!(
        "{} owned by {}",
        filters.join(", "),
        wanted.owners.join(", ")
    )
}

#[async_trait]
impl Step<Ec2State> for StepSourceAmi {
    fn name(&self) -> &'static str {
        "source_ami"
    }

    async fn run(&mut self, state: &mut Ec2State, cx: &StepContext) -> Result<(), StepError> {
        let config = &self.plan.config;
        let image = match (&config.source_ami, &config.source_ami_filter) {
            (Some(id), _) => self.by_id(id).await?,
            (None, Some(wanted)) => self.by_filter(wanted).await?,
            (None, None) => {
                return Err(StepError::failed("no `source_ami` or `source_ami_filter`"));
            }
        };
        let id = image.image_id().unwrap_or_default().to_owned();
        if let Some(state) = image.state()
            && state.as_str() != "available"
        {
            return Err(StepError::failed(format!(
                "source AMI {id} is {}, not available",
                state.as_str()
            )));
        }
        if image.root_device_type() == Some(&DeviceType::InstanceStore) {
            return Err(StepError::failed(format!(
                "source AMI {id} is instance-store backed; the ec2 builder makes EBS-backed AMIs and needs an EBS-backed source"
            )));
        }
        let source = SourceAmi {
            id,
            name: image.name().map(str::to_owned),
            owner: image.owner_id().map(str::to_owned),
            creation_date: image.creation_date().map(str::to_owned),
            root_device_name: image.root_device_name().map(str::to_owned),
        };
        cx.log.info(format!(
            "source AMI {} ({}) owned by {}, created {}",
            source.id,
            source.name.as_deref().unwrap_or("unnamed"),
            source.owner.as_deref().unwrap_or("unknown"),
            source
                .creation_date
                .as_deref()
                .unwrap_or("at an unknown time")
        ));
        state.source = Some(source);
        Ok(())
    }
}
